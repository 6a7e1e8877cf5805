"""Training configs: `schema` (every key with its default), `validation` (ranges and choices), `files`
(loading config files and command-line overrides)."""
