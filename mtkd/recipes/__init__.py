"""Recipes built on the library: the embedded demo, its experiments and report, and the small
local tokenizers and models they train. The library never imports this package."""
