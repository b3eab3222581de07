"""Lightning strategies (DDPStrategy subclasses) for methods that run one model per rank."""
