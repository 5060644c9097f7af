# A hostile guest: programs the first virtio-mmio device (entropy) with nonsense -- an oversized
# queue, rings outside guest memory, features it was never offered, DRIVER_OK regardless, notifies
# -- and pokes registers with wrong access sizes. The VMM must survive and keep serving: the guest
# then prints "hostile:ok" and resets.
    pvh_note
    .text
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    putc 'h'
    putc 'o'
    putc 's'
    putc 't'
    putc 'i'
    putc 'l'
    putc 'e'
    putc ':'
    mov $0xd0000000, %edi
    movl $0, 0x70(%edi)             # Status: reset
    movl $3, 0x70(%edi)             # ACKNOWLEDGE | DRIVER
    movl $1, 0x24(%edi)             # DriverFeaturesSel = 1
    movl $0xffffffff, 0x20(%edi)    # DriverFeatures: everything, offered or not
    movl $0xb, 0x70(%edi)           # FEATURES_OK
    movl $0, 0x30(%edi)             # QueueSel 0
    movl $0xffff, 0x38(%edi)        # QueueNum: not a power of two, far over max
    movl $0xfffff000, 0x80(%edi)    # QueueDescLow: outside guest memory
    movl $0xffffffff, 0x84(%edi)    # QueueDescHigh
    movl $0xfffff000, 0x90(%edi)    # QueueDriverLow
    movl $0xfffff000, 0xa0(%edi)    # QueueDeviceLow
    movl $1, 0x44(%edi)             # QueueReady
    movl $0xf, 0x70(%edi)           # DRIVER_OK
    movl $0, 0x50(%edi)             # QueueNotify 0
    movl $7, 0x50(%edi)             # QueueNotify for a queue that does not exist
    movl $99, 0x30(%edi)            # QueueSel out of range
    movl $1, 0x44(%edi)
    movb $0xff, 0x70(%edi)          # byte write to a 32-bit register
    movw $0xffff, 0x100(%edi)       # config space of a device that has none
    movl $0xdeadbeef, 0xffc(%edi)   # last word of the window
    movl $0xdeadbeef, 0xc0000001    # boot timer, wrong offset
    mov 0x70(%edi), %eax            # reading status still works
    putc 'o'
    putc 'k'
    putc '\n'
    i8042_reset
