"""Tools as plain Python functions: a typed signature and a docstring become OpenAI's tool schema.

    def weather(city: Annotated[str, Field(description="a city name")]) -> str:
        \"\"\"Today's weather in a city.\"\"\"

The docstring's first paragraph tells the model what the tool does and when to call it; the
parameters' types (and `Annotated[..., Field(description=...)]`) become the JSON schema, built
by pydantic (`create_model` over the signature), which also checks the arguments a model sends
before the function runs. One way to build a schema, the one OpenAI's own SDK helpers use.

A call never crashes the chat (`ToolRegistry.call`): unknown tool, arguments that are not JSON
or do not fit the signature, an exception, or no answer within the timeout each become an error
text for the model, and the turn goes on. A function still running past its timeout is left to
finish in its daemon thread (Python cannot kill a thread); the built-ins bound their own work.

Your own tools: a function in an installed package's entry point group `jarvis.tools`

    [project.entry-points."jarvis.tools"]
    weather = "my_package.tools:weather"

or `JARVIS_TOOLS="my_package.tools:weather,other.module:fn"` in the environment.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from jarvis.tools.calls import ToolCall, ToolResult

ENTRY_POINT_GROUP = "jarvis.tools"
TOOLS_ENV = "JARVIS_TOOLS"
DEFAULT_TIMEOUT_S = 10.0
MAX_RESULT_CHARS = 4000  # a tool's answer goes into the model's context: keep it short


class ToolDefinitionError(ValueError):
    """A function that cannot be a tool; the message names it and says what to change."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    function: Callable[..., Any]
    arguments: type[BaseModel]  # the signature as a pydantic model: the schema, and the check of a call

    def schema(self) -> dict[str, Any]:
        """OpenAI's `tools=[...]` entry."""
        parameters = self.arguments.model_json_schema()
        parameters.pop("title", None)
        for prop in parameters.get("properties", {}).values():
            prop.pop("title", None)  # pydantic's "Expression" for `expression`: tokens the model does not need
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": parameters}}


def tool(function: Callable[..., Any], name: str | None = None) -> Tool:
    """`function` as a tool: every parameter typed, a docstring, no *args or **kwargs."""
    label = getattr(function, "__qualname__", repr(function))
    description = (inspect.getdoc(function) or "").split("\n\n")[0].strip()
    if not description:
        raise ToolDefinitionError(f"tool {label} has no docstring: the model reads it to know when to call the tool")
    hints = get_type_hints(function, include_extras=True)
    fields: dict[str, Any] = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolDefinitionError(f"tool {label}: *{parameter.name} cannot be described to a model; name each parameter")
        if parameter.name not in hints:
            raise ToolDefinitionError(f"tool {label}: parameter {parameter.name!r} has no type annotation")
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], default)
    name = name or function.__name__
    arguments = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    return Tool(name, " ".join(description.split()), function, arguments)


def _run_with_timeout(function: Callable[[], Any], timeout: float) -> Any:
    """`function()` in a daemon thread, waited on for `timeout` seconds (TimeoutError past it)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = err

    worker = threading.Thread(target=target, daemon=True, name="jarvis-tool")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class ToolRegistry:
    """The tools a conversation offers, by name."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout = timeout
        self.tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        made = item if isinstance(item, Tool) else tool(item)
        if made.name in self.tools:
            raise ToolDefinitionError(f"two tools named {made.name!r}: {self.tools[made.name].function!r} and "
                                      f"{made.function!r}")
        self.tools[made.name] = made
        return made

    def __len__(self) -> int:
        return len(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call; whatever goes wrong comes back as `ToolResult.error`, never raised."""
        found = self.tools.get(call.name)
        if found is None:
            return ToolResult(call, error=f"no tool named {call.name!r}; the tools are {', '.join(self.tools) or 'none'}")
        try:
            raw = json.loads(call.arguments or "{}")
        except ValueError as err:
            return ToolResult(call, error=f"the arguments are not JSON ({err}): {call.arguments[:200]!r}")
        if not isinstance(raw, dict):
            return ToolResult(call, error=f"the arguments must be a JSON object, got {call.arguments[:200]!r}")
        try:
            arguments = found.arguments.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in err.errors())
            return ToolResult(call, error=f"bad arguments for {call.name}: {problems}")
        values = {key: getattr(arguments, key) for key in type(arguments).model_fields}
        try:
            value = _run_with_timeout(lambda: found.function(**values), self.timeout)
        except Exception as err:  # noqa: BLE001  (the model is told; the chat goes on)
            return ToolResult(call, error=str(err) if isinstance(err, (TimeoutError, ValueError)) and str(err)
                              else f"{type(err).__name__}: {err}")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f"... ({len(text) - MAX_RESULT_CHARS} more characters cut)"
        return ToolResult(call, result=text)


def _load_reference(reference: str, where: str) -> Callable[..., Any]:
    module, _, attribute = reference.strip().partition(":")
    if not module or not attribute:
        raise ToolDefinitionError(f"{where}: {reference!r} is not `package.module:function`")
    try:
        function = getattr(import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ToolDefinitionError(f"{where}: cannot load {reference!r}: {err}") from None
    if not callable(function):
        raise ToolDefinitionError(f"{where}: {reference!r} is not a function")
    return function


def user_tools(environ: dict[str, str] | None = None) -> list[Tool]:
    """The tools the user added: entry points in group `jarvis.tools` (named by the entry point),
    then $JARVIS_TOOLS (comma-separated `package.module:function`). A bad one is an error naming it."""
    environ = os.environ if environ is None else environ
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            function = point.load()
        except Exception as err:  # noqa: BLE001  (a broken plugin is named, not a traceback)
            raise ToolDefinitionError(f"entry point {point.name} = {point.value!r} ({ENTRY_POINT_GROUP}): {err}") from None
        found.append(tool(function, name=point.name))
    for reference in filter(str.strip, environ.get(TOOLS_ENV, "").split(",")):
        found.append(tool(_load_reference(reference, f"${TOOLS_ENV}")))
    return found
