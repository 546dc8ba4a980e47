"""Developer tools: the ahead-of-time compile report."""
