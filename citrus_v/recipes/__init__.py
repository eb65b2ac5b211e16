"""The demo, the tiny-base recipe and the tiny presets: an experiment kit built on the library, not part of it."""
