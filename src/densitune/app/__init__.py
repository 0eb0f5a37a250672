"""Services under the CLI and the library API: train, search and study; typed options in, an outcome out."""
