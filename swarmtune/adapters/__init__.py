"""The adapter runtime that clients and servers share: client-owned LoRA, soft prompts, and PEFT's
on-disk format. It knows nothing of the network or of the training loop."""
