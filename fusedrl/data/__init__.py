"""Data: records, chat templates, tokenization, packed batches."""
