"""`reactor launch`: a recipe from this machine to a SkyPilot managed job on spot VMs, and
the PRIME model back.

Reactor Core does not schedule anything itself: SkyPilot provisions the VMs, recovers
the job after a preemption and mounts the bucket; Reactor Core writes the task, checks
the recipe before anything is paid for, and makes the job's exit codes mean what
SkyPilot's recovery needs (75: checkpointed, restart me; 2: a bad recipe, do not).

    preflight.py   the recipe checked here: data, model, the memory estimate for the GPU asked for
    bucket.py      inputs staged in the recipe's bucket; the PRIME model fetched back, sha256 verified
    task.py        the SkyPilot task: resources, recovery, file mounts, envs, setup, run
    source.py      what the VMs install: a wheel of the reactor-core this machine runs
    skypilot.py    SkyPilot in its own virtualenv: found, asked to parse the task, run
    cli.py         `reactor launch RECIPE`, `reactor launch status|logs|cancel`

SkyPilot lives in its own virtualenv (its pins clash with this project's: see
`skypilot.py`), so nothing here imports `sky`; it runs SkyPilot's Python and CLI.
"""
