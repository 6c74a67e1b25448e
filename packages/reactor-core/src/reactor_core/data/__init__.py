"""Chat data for training: read and validate JSONL, render with the chat template,
label the assistant's replies, and pack examples into rows.

The pipeline, in the order a recipe calls it:

    examples, report = load_chat_file(path)                   # validation.py
    train, val = split_examples(examples, val_fraction=0.05, seed=0)
    tokenized, issues = tokenize_dataset(train, tokenizer, max_seq_length=2048)
    rows = pack_examples(tokenized, 2048)                      # packing.py
    batch = collate_packed(rows[:8], 2048, tokenizer.pad_token_id)

Everything that can be wrong with the data is found before the first step, and each
problem points at its `path:line`. Chat lines may carry images (images.py checks each
one as the file is read); `example.processor_inputs()` gives a vision processor its
messages and RGB images.
"""

from reactor_core.data.formats import (
    ChatExample,
    DataFormatError,
    Message,
    Part,
    Role,
    messages_from_alpaca,
    messages_from_chat,
    messages_from_sharegpt,
    parse_record,
)
from reactor_core.data.images import ImageError, ImageLimits, ImagePart, open_rgb
from reactor_core.data.packing import Batch, collate_packed, collate_padded, pack_examples, with_images
from reactor_core.data.tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    ImageTokens,
    TokenizedExample,
    tokenize_chat,
    tokenize_dataset,
)
from reactor_core.data.validation import (
    DataIssue,
    DataReport,
    DataValidationError,
    load_chat_file,
    split_examples,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ChatExample",
    "ChatTemplateError",
    "DataFormatError",
    "DataIssue",
    "DataReport",
    "DataValidationError",
    "ImageError",
    "ImageLimits",
    "ImageTokens",
    "ImagePart",
    "Message",
    "Part",
    "Role",
    "TokenizedExample",
    "collate_packed",
    "collate_padded",
    "load_chat_file",
    "open_rgb",
    "messages_from_alpaca",
    "messages_from_chat",
    "messages_from_sharegpt",
    "pack_examples",
    "parse_record",
    "split_examples",
    "tokenize_chat",
    "tokenize_dataset",
    "with_images",
]
