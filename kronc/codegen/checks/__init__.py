"""Input checks of the ``kronc::`` ops, shared by the ops and the Triton wrappers (which sit below the ops)."""
