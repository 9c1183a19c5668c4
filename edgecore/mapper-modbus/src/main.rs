//! `modbus-mapper`: a Modbus TCP mapper speaking KubeEdge's DMI to edgecore. (Skeleton: filled in
//! by the mapper work.)

fn main() -> std::process::ExitCode {
    eprintln!("modbus-mapper: not built yet");
    std::process::ExitCode::FAILURE
}
