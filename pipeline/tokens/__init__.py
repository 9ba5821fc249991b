"""The token path: the Phi-3 tokenizer, the two-phase mixture, Megatron shards, the
trainer feed and the smoke train."""
