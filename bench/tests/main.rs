//! Integration tests of `relay-bench` against the stack of `scripts/stack up` (STACK_* env).

mod ab;
