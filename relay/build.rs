// `sqlx::migrate!` embeds migrations/ at compile time, but on stable Rust the macro cannot tell
// Cargo to watch the directory: without this, a new migration file is not embedded until
// something else makes the relay recompile (sqlx's documented workaround).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
