"""Text and data handling: prompts, parsers, rule filters, near-duplicates, records, SFT rows."""
