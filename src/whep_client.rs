//! A minimal WHEP viewer on str0m, used by `demo --check` to prove video flows.
