//! Host libfabric discovery and ELF facts for injecting host fabric libraries into containers.
