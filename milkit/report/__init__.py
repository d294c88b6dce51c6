"""HTML + Markdown reports (the ``milkit demo`` report and its building blocks)."""
