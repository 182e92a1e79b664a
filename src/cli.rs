//! `ssegate publish`: one event from the command line (data from the flag, or stdin with `-`),
//! through the public gRPC API (`grpc::client`).

use std::io::Read;

use crate::config::PublishArgs;

/// Sends the event and returns its id.
pub async fn publish(mut args: PublishArgs) -> anyhow::Result<String> {
    let data = if args.data == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::mem::take(&mut args.data)
    };
    crate::grpc::client::publish(args, data).await
}
