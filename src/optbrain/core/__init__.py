"""Pure tensor math of optbrain: Hessians, grids, exact OBS/OBQ solvers. No modules, no I/O."""
