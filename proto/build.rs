//! Compiles the `.proto` files with protox (no system `protoc`) and
//! generates the prost messages (with `prost::Name`) and tonic stubs.
//! Writes two descriptor sets: the API's, for server reflection, and the
//! demo contracts', for registering them with the broker.

use std::path::PathBuf;

const API: &str = "handoff/v1/handoff.proto";
const DEMO: &str = "handoff/demo/v1/demo.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for f in [API, DEMO] {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let api = protox::compile([API], ["."])?;
    std::fs::write(
        out.join("handoff_descriptor.bin"),
        prost::Message::encode_to_vec(&api),
    )?;
    let demo = protox::compile([DEMO], ["."])?;
    std::fs::write(
        out.join("demo_descriptor.bin"),
        prost::Message::encode_to_vec(&demo),
    )?;
    let all = protox::compile([API, DEMO], ["."])?;
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    // `Any` type URLs in the conventional form, as other languages write them.
    config.type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds_with_config(all, config)?;
    // The server's stubs apart, over the messages above, with a codec that
    // answers a request body that does not decode with INVALID_ARGUMENT.
    let server_out = out.join("server");
    std::fs::create_dir_all(&server_out)?;
    let mut config = tonic_prost_build::Config::new();
    config.extern_path(".handoff.v1", "crate::pb");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&server_out)
        .codec_path("crate::codec::ServerCodec")
        .compile_fds_with_config(protox::compile([API], ["."])?, config)?;
    Ok(())
}
