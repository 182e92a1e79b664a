//! Compiles `proto/ssegate/v1/*.proto` with protox (pure Rust, so no system `protoc` is needed)
//! and generates the tonic server and client. The encoded descriptor set of the services the
//! server serves (the publisher's file) is written next to the generated code for gRPC server
//! reflection; the whole set (with `authorizer.proto`, which the backend implements and ssegate
//! calls) is what pbjson-build reads to generate the proto3 JSON mapping (serde impls of the
//! same prost types) for HTTP/JSON on the gRPC port and Connect calls to an authorizer.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/ssegate/v1/publisher.proto", "proto/ssegate/v1/authorizer.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let encoded = fds.encode_to_vec();
    // Reflection lists what this server serves: not the Authorizer, which it only calls.
    let mut served = fds.clone();
    served.file.retain(|f| f.name() != "ssegate/v1/authorizer.proto");
    fs::write(out.join("ssegate_descriptor.bin"), served.encode_to_vec())?;
    // The gRPC paths of every method served, derived from the proto (metrics label calls by them).
    let mut methods = Vec::new();
    for file in &served.file {
        for service in &file.service {
            for method in &service.method {
                methods.push(format!("{}.{}/{}", file.package(), service.name(), method.name()));
            }
        }
    }
    let table = format!(
        "/// `package.Service/Method` of every method in the ssegate protos.\npub const METHODS: [&str; {}] = {:?};\n",
        methods.len(),
        methods
    );
    fs::write(out.join("ssegate_methods.rs"), table)?;
    // Our codec (src/grpc/codec.rs): undecodable requests are INVALID_ARGUMENT, not INTERNAL.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::grpc::codec::Codec")
        .compile_fds(fds)?;
    // Fields with default values are written too (proto3 JSON allows it; plain HTTP clients
    // then see every field); unknown fields in a request are an error, as in protojson.
    pbjson_build::Builder::new().register_descriptors(&encoded)?.emit_fields().build(&[".ssegate.v1"])?;
    Ok(())
}
