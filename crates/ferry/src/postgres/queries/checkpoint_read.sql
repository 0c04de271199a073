SELECT checkpoint FROM {p}leases WHERE partition_no = $1
