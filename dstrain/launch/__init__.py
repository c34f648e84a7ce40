"""Launch helpers around horovodrun and mpirun."""
