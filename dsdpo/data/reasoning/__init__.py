"""Building reasoning preference pairs from problems with correct worked solutions (`dsdpo make-pairs`)."""
