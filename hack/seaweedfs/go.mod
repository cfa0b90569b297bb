// Builds the SeaweedFS server (`weed`, whose `server -s3` mode is an S3-compatible object store) from
// its Go module, for the object-storage tests and local development.
module kubetune.io/hack/seaweedfs

go 1.26.6

require github.com/seaweedfs/seaweedfs v0.0.0-20261109003541-7506e5f91cd6
