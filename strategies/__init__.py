"""Built-in strategy plugins. Each module registers through the same hook as third-party plugins."""
