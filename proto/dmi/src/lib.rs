//! KubeEdge's Device Management Interface, v1beta1: the gRPC API between edgecore
//! (`DeviceManagerService`, which mappers call) and each mapper (`DeviceMapperService`, which
//! edgecore calls), both over Unix sockets. `pb` is generated from `proto/dmi/v1beta1/api.proto`,
//! whose names and field numbers are KubeEdge's, so KubeEdge's mappers work unchanged.
//!
//! `convert` turns the API's `devices` types into DMI messages (what edgecore sends a mapper)
//! and free-form configuration values into and out of the `google.protobuf.Any` wrappers
//! KubeEdge puts in `CustomizedValue`.

#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("v1beta1");
}

pub mod convert;

/// The socket edgecore serves `DeviceManagerService` on unless told otherwise (KubeEdge's).
pub const DEFAULT_DMI_SOCKET: &str = "/etc/kubeedge/dmi.sock";
/// `MapperInfo.api_version` a mapper of this project sends.
pub const API_VERSION: &str = "v1beta1";
