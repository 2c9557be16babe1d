"""In-process fixes for bugs in the libraries NVFP4 checkpoints are loaded with, and the start-up hook."""
