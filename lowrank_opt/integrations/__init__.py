"""Optional integrations: Hugging Face Trainer (hf), DeepSpeed (deepspeed). Import them explicitly."""
