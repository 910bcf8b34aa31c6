//! Writes the seed corpora: `corpus/TARGET/NAME` for every seed of `roomcast_fuzz::seeds`.
//! Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! Files of other names (inputs a fuzzer added) are left alone.

fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds = roomcast_fuzz::seeds::all();
    for s in &seeds {
        let dir = root.join(s.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(s.name), &s.bytes)?;
    }
    println!("{} seeds written under {}", seeds.len(), root.display());
    Ok(())
}
