"""Guest reads: the bytes the guest sees (mapping, backing chain, compressed clusters,
external data files) and the allocation map ``qemu-img map`` prints."""
