"""Model and tokenizer loading, long texts (truncate, head and tail, windows) and packed batches."""
