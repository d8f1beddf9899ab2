"""Fused PSO update kernels (a later step); ``psops_mpi.swarm.pso_update_`` is the reference."""
