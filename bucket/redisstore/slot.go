package redisstore

// slots is how many hash slots Redis Cluster divides the key space into.
const slots = 16384

// crcTable is the CRC16/XMODEM table (polynomial 0x1021, initial value 0),
// the checksum Redis Cluster hashes keys with.
var crcTable = func() (t [256]uint16) {
	for i := range t {
		crc := uint16(i) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
		t[i] = crc
	}
	return t
}()

// slot returns the Redis Cluster hash slot of a key whose hash tag is tag.
// Every key of an operation has the operation's tag (its subject's group,
// "g/<n>", for a bucket request; its escaped subject for a lease; see
// key.go), so the store finds an operation's slot without looking at its
// keys.
func slot(tag string) uint16 {
	var crc uint16
	for i := range len(tag) {
		crc = crc<<8 ^ crcTable[byte(crc>>8)^tag[i]]
	}
	return crc % slots
}
