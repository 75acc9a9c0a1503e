"""dclip: distil large CLIP models into smaller, sharper ones (DCLIP, CLIP-CID), Hugging Face-native.

Kept import-light on purpose: `import dclip` loads nothing heavy; import the submodules you need.
"""

__version__ = "0.1.0"
