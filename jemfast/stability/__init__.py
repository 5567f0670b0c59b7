"""Stability and recovery: divergence detected on the device (:mod:`.monitor`), the natural
collapse and when it began (:mod:`.collapse`), the recovery policy and the good states a
rollback can reach (:mod:`.recovery`), a divergence made on purpose for tests
(:mod:`.inject`), and what :class:`jemfast.Guard` takes from a foreign loop (:mod:`.loop_inputs`).
Used by ``jemfast.train`` and by :class:`jemfast.Guard`."""
