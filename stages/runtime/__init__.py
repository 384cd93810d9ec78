"""What every stage runs on: its context, storage (file:// and s3://) and builtin:// resources."""
