"""voxarc network face: DIMSE application entity, configuration, command line, admin web."""
