//! TURN core
