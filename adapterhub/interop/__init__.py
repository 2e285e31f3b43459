"""Conversions to and from other adapter formats (PEFT SHiRA)."""
