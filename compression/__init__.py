"""Model compression under a latency budget: HAQ mixed precision, AMC pruning (`codesign.compression`)."""
