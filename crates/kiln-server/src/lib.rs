//! Server wiring (being written).
