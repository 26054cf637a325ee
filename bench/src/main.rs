//! `relay-bench`: load generator and measurements of the relays. Filled in by the relay issues.

fn main() {
    println!("relay-bench: no benchmark is built yet");
}
