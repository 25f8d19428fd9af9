"""r1mega."""
