"""Data: files -> rows -> encoding -> the prepared cache -> streaming; examples and collators; chat and pairs.

- `files`: local files and Hub datasets read row by row (CSV, JSON Lines, JSON, parquet, text)
- `formats`: which kind of data a file holds; rows as conversations
- `rows`: rows checked and normalised (labels, columns, formats) into Arrow
- `encoding`: rows tokenized by worker processes; packing
- `chat`: conversations to ids with assistant-only labels
- `pairs`: preference pairs (prompt, chosen, rejected)
- `prompts`: --objective grpo's prompts (text or messages) and the columns rewards read
- `prepare`: the keyed, memory-mapped prepared-data cache (`llmkit prepare`)
- `streaming`: --streaming: read, tokenize and pack while training
- `examples`: the encoded examples, labels, the collator and the epoch sampler the loop takes
"""

from llmkit import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "examples": ["Collator", "EpochSampler", "ExampleSet", "Labels"],
    "formats": ["Conversation", "read_conversations"],
    "chat": ["ChatEncoder"],
    "pairs": ["Pair", "encode_pairs"],
    "prompts": ["PromptCollator", "PromptSet"],
    "prepare": ["Prepared", "prepare_data", "prepare_eval"],
    "files": ["find_sources"],
    "streaming": ["StreamingExamples"],
})
