"""Training on the one model definition: pretraining on packed documents, SFT on chat data, LoRA, MoE expert-bias
balancing, FSDP2 scale-out, and the demo model that ships as the offline default."""
