//! PMI-1 and PMI-2 for MPI process managers: the wire codec, a server, and a probe for host PMI
//! libraries.
