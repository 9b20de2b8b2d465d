"""Ship a fine-tuned run where people run models."""
