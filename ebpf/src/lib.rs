//! Kernel probes: see ARCHITECTURE.md.
