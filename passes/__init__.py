"""Graph passes, one file each (installed as tunecomp_fx.passes)."""
