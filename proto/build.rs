//! Compiles `tagstream/v1/*.proto` with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=tagstream");
    let descriptors = protox::compile(["tagstream/v1/points.proto", "tagstream/v1/write.proto"], ["."])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
