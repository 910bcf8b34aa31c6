//! roomcast edge: see ARCHITECTURE.md.
